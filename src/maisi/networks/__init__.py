"""Networks: the VAE-GAN autoencoder, the diffusion UNet and the ControlNet."""
