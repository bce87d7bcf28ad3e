"""Image differencing: template warping, Alard-Lupton with decorrelation, and ZOGY."""
