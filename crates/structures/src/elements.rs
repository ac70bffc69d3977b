//! The periodic table: chemical symbols and atomic numbers (Z = 1..=118).

/// Chemical symbols indexed by atomic number (index 0 is the placeholder `X`, as in ASE).
pub const SYMBOLS: [&str; 119] = [
    "X", "H", "He", "Li", "Be", "B", "C", "N", "O", "F", "Ne", "Na", "Mg", "Al", "Si", "P", "S",
    "Cl", "Ar", "K", "Ca", "Sc", "Ti", "V", "Cr", "Mn", "Fe", "Co", "Ni", "Cu", "Zn", "Ga", "Ge",
    "As", "Se", "Br", "Kr", "Rb", "Sr", "Y", "Zr", "Nb", "Mo", "Tc", "Ru", "Rh", "Pd", "Ag", "Cd",
    "In", "Sn", "Sb", "Te", "I", "Xe", "Cs", "Ba", "La", "Ce", "Pr", "Nd", "Pm", "Sm", "Eu", "Gd",
    "Tb", "Dy", "Ho", "Er", "Tm", "Yb", "Lu", "Hf", "Ta", "W", "Re", "Os", "Ir", "Pt", "Au", "Hg",
    "Tl", "Pb", "Bi", "Po", "At", "Rn", "Fr", "Ra", "Ac", "Th", "Pa", "U", "Np", "Pu", "Am", "Cm",
    "Bk", "Cf", "Es", "Fm", "Md", "No", "Lr", "Rf", "Db", "Sg", "Bh", "Hs", "Mt", "Ds", "Rg", "Cn",
    "Nh", "Fl", "Mc", "Lv", "Ts", "Og",
];

/// The largest atomic number matscale knows.
pub const MAX_ATOMIC_NUMBER: u8 = 118;

/// The chemical symbol of atomic number `z`, or `None` outside 1..=118.
pub fn symbol(z: u8) -> Option<&'static str> {
    if (1..=MAX_ATOMIC_NUMBER).contains(&z) {
        Some(SYMBOLS[z as usize])
    } else {
        None
    }
}

/// The atomic number of a chemical symbol (exact, case-sensitive as in ASE: `"Cu"`, not `"CU"`).
pub fn atomic_number(symbol: &str) -> Option<u8> {
    SYMBOLS
        .iter()
        .skip(1)
        .position(|s| *s == symbol)
        .map(|i| (i + 1) as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbols_round_trip() {
        for z in 1..=MAX_ATOMIC_NUMBER {
            assert_eq!(atomic_number(symbol(z).unwrap()), Some(z));
        }
        assert_eq!(atomic_number("Cu"), Some(29));
        assert_eq!(atomic_number("Og"), Some(118));
        assert_eq!(atomic_number("Xx"), None);
        assert_eq!(atomic_number("X"), None);
        assert_eq!(symbol(0), None);
        assert_eq!(symbol(119), None);
    }
}
