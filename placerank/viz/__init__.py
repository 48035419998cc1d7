"""Pictures for people: matched keypoints between two images (``draw_matches``)."""
