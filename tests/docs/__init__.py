"""Tests of the documentation: README snippets and the sample data."""
