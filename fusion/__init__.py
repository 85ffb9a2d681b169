"""Graph learning and modality fusion: a GNN over the knowledge graph, a learned fusion of text, image and graph
embeddings, training, evaluation metrics and top-K retrieval."""
