"""Notebook runtime: kernel containers over lazyfs."""
