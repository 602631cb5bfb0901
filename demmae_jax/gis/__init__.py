"""GIS-ready outputs of a prediction: Cloud-Optimized GeoTIFFs, uncertainty, calibration, building
and road polygons with heights, object-level scores and change between two surveys."""
