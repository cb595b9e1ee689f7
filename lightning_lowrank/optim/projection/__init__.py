"""Choosing a layer's subspace: the bases and their math (SVD, randomized SVD, DCT, random, Gaussian), the
``projector=`` families, and the refresh that picks a new P and carries the moments into it.
"""
