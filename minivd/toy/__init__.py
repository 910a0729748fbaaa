"""A trained toy Versatile Diffusion world: shapes and captions, and the frozen components trained on them."""
