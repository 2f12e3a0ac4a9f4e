"""Image generation (gen_img.py, sdxl_gen_img.py): networks, output files and their PNG metadata."""
