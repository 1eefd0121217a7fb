"""Image-quality metrics of text-to-image samples, each as its reference implementation computes it.

    preprocess.py   images -> the pixels each metric's model reads
    clip_features.py  a CLIP model with its tokenizer: L2-normalised image and prompt embeddings
    clip_score.py   CLIP score (torchmetrics' definition, OpenAI ViT-L/14)
    aesthetic.py    the LAION aesthetic predictor v2 (a linear head on ViT-L/14 image embeddings)
    hps.py          HPS v2.1 (an OpenCLIP ViT-H/14)
    pickscore.py    PickScore v1 (a transformers CLIP-H)
    fidelity.py     PSNR and SSIM against a reference image
    stats.py        a paired difference over prompts with its 95% confidence interval
    registry.py     name -> which files to load and what a score call needs
"""
