"""Linear algebra kernels: batched small symmetric eigenvalues (the C kernel and its LAPACK fallback)."""
