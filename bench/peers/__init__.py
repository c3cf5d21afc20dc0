"""Peers trioai is compared with: the designs users would otherwise pick."""
