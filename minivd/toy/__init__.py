"""The toy Versatile Diffusion: a world of coloured shapes with captions, and the frozen components VD trains its
UNets on top of, trained on that world with minivd's own classes at toy sizes. This is a model trained on
shapes, not VD's weights.

    world.py          the toy world: scenes, renders (Pillow), captions, parse_caption, training batches
    vocab.py          CLIP, BERT and GPT-2 tokenizers trained on the caption language, in the real file layouts
    judge.py          an independent attribute classifier that grades images (trained on renders only)
    train_vae.py      the image VAE (AutoencoderKL, 64 px -> 4 x 8 x 8) and its latent scale factor
    train_clip.py     the CLIP text and vision towers, trained contrastively (context width 64)
    train_optimus.py  the Optimus text VAE (BERT encoder, GPT-2 decoder, 32-d latent)
    common.py         learning-rate schedule, progress line, augmentation, saving a component
    components.py     `python -m minivd.toy.components --out DIR`: every stage, its files and measurements
"""
