"""citrus_edge.calib_data"""
