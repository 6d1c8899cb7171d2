"""Curation of url/caption tables and of downloaded shards: table in, table out, every removal counted and kept.

    python -m data_prep.curate balance --input urls.parquet --metadata entries.txt --output curated/ --threshold 20000
    python -m data_prep.curate score --shards shards/ --model local-dir:exported/
    python -m data_prep.curate filter --shards shards/ --output cut/ --keep-fraction 0.3
    python -m data_prep.curate dedup --shards cut/ --scores shards/_scores --output deduped/ --eval-images eval/

See data_prep/README.md. Modules: `chunks` (tables streamed in and out), `shardio` (samples of tar
shards), `balance` (MetaCLIP/WIT balancing), `score` (CLIP scores and image embeddings beside the
shards), `cut` (score cuts), `dedup` (near-duplicates and evaluation-set copies), `__main__`.
"""
