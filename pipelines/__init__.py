"""Ray Data stages that turn raw crawl into curated text and packed token shards."""
