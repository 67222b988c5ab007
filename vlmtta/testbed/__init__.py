"""Offline testbed."""
