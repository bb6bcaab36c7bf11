"""Downstream fine-tuning: a pulled encoder plus a decoder, with few labels, against training from scratch."""
