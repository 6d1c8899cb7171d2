"""Data preparation for clip_pl: url/caption tables -> WebDataset shards (img2dataset), manifests,
stats, caption hygiene, and a demo corpus served by a local fault-injecting web server.

    python -m data_prep.download --input urls.parquet --output shards/
    python -m data_prep.demo --out demo_data/
    python -m data_prep.curate balance|score|filter|dedup …   (curation: data_prep/curate/)

This package never imports the training code (clip_pl).
"""

import os

# albumentations (imported by img2dataset, also in its spawned workers) checks PyPI for a newer
# version on import; that is network traffic at run time and a stall without internet.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
