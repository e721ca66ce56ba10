"""The bundled Sort-of-CLEVR dataset (Santoro et al. 2017), generated from a seed: its preparation
(prepare). The mixed pipeline (configs/mix/) trains on it beside easy-vqa; the general package does not use it."""
