"""Recommenders; every model of one kind shares its parameter layout across domains."""
