"""Tests of trajscope.cli: analyze and info commands, argument validation."""
