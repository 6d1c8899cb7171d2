"""Curation of url/caption tables and of downloaded shards: table in, table out, every removal counted.

    python -m data_prep.curate balance --input urls.parquet --metadata entries.txt --output curated/ --threshold 20000

See data_prep/README.md ("data_prep.curate"). Modules: `chunks` (streaming tables in and out),
`balance` (MetaCLIP/WIT-style balancing), `__main__` (the command line).
"""
