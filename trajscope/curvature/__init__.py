"""The curvature of a node's loss: per-node blocks (Hessian / Gauss-Newton) and global sharpness."""
