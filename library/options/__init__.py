"""Every command-line flag, declared once; scripts compose the add_*_arguments groups."""
