"""Off-the-shelf prediction: one ensemble packed into a folder (`export`), and one case run
through it (`predict_case`). `format` is the folder both share."""
