"""cv_ray: Ray-distributed RL that teaches vision-language models to think with images through code."""

__version__ = "0.1.0"
