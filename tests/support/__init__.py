"""Helpers that start real servers, build test images and compare trees."""
