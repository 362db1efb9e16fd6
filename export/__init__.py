"""citrus_edge.export"""
