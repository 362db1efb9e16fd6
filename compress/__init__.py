"""citrus_edge.compress"""
