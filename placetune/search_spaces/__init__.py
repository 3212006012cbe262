"""The built-in search spaces, shipped as package data; see placetune.space for their format."""
