"""What every part shares and none of it is FLUX's: errors and files (util), the valid range of every number a command
takes (bounds), image files read as RGB (images)."""
