"""apt_ray: APT and peers on vision-language backbones."""
__version__ = "0.1.0"
