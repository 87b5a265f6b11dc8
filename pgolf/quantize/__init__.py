"""The post-training stages: Hessians from training data, GPTQ with SDClip, LQER corrections."""
