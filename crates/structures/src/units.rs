//! Unit conversions between the conventions of DFT codes and ASE's (eV, Å).

/// eV/Å^3 in GPa: 1 eV/Å^3 = 160.21766208 GPa.
pub const EV_PER_A3_IN_GPA: f64 = 160.217_662_08;

/// One GPa in eV/Å^3.
pub const GPA: f64 = 1.0 / EV_PER_A3_IN_GPA;

/// One kBar in eV/Å^3 (1 kBar = 0.1 GPa).
pub const KBAR: f64 = 0.1 * GPA;

/// Converts a stress in kBar with the VASP/pymatgen sign (compressed cell positive) to eV/Å^3
/// with the ASE sign (compressed cell negative): σ_ASE = −σ_kBar / 1602.1766208.
pub fn vasp_kbar_to_ase(kbar: f64) -> f64 {
    -kbar * KBAR
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kbar_conversion() {
        assert!((vasp_kbar_to_ase(1602.1766208) + 1.0).abs() < 1e-12);
        assert!((10.0 * KBAR - GPA).abs() < 1e-18);
    }
}
