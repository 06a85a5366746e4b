"""A model bundle applied to any head CT: `infer`, `evaluate`, and pulling a study from a PACS (`dicomweb`)."""
