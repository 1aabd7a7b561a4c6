"""`maisi evaluate augment`: does adding synthetic image–mask pairs to real data help a downstream segmenter?"""
