"""Tests of trajscope (a package so that same-named modules in different folders import apart)."""
