//! Training and evaluation of matscale models.
