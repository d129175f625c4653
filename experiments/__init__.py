"""Experiment sweeps over the Flower app: run a grid of settings, tabulate and plot them."""
