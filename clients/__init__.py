"""Flower ClientApp of a domain party: message in -> fedmerge call -> message out."""
