"""Tests of trajscope.integrations: Lightning and Hugging Face."""
