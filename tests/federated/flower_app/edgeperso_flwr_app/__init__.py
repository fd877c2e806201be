"""EdgePerso's Flower ServerApp and ClientApp as a deployment runs them (test app)."""
