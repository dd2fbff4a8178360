"""Overrides that turn a tiny config's synthetic data into bucketed images of 3 aspect ratios and a square."""

SIZES = "[[60,100],[100,60],[64,64],[40,120]]"
BUCKETED = ["data.buckets.enabled=true", "data.buckets.step=16", f"data.synthetic.sizes={SIZES}"]
