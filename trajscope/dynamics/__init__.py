"""The dynamics of a node: its update map and spectrum, kinematics, motion, labels."""
