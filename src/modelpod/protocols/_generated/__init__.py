"""Stubs generated from ../open_inference.proto; see ../_generate.py."""
