"""citrus_edge.runtime"""
