"""Tests of trajscope: one folder per subpackage (a package, so same-named test modules in different folders import apart)."""
