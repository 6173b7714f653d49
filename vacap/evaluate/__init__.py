"""Object-hallucination metrics for captions and yes/no answers on MS-COCO images.

``chair`` scores free-form captions with CHAIR (Rohrbach et al., 2018); ``pope`` builds and
scores POPE yes/no object questions (Li et al., 2023); ``coco`` holds the COCO word data both use.
"""
