"""Torture runs for MusicFS; see scripts/torture and common.py."""
