"""Sample images: prompt files, kohya's sampler names and the small text-to-image pipeline."""
