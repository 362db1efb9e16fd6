"""citrus_edge.engines"""
