"""GAN models, losses, training steps and the self-describing generator export."""
