//! Running the frozen networks into the feature store: the ViT features and CLIP frame
//! embeddings of every video ([`extract`]), the CLIP text embeddings and pseudo-labels of every
//! question ([`labels`]), the frozen networks' loaders ([`frozen`]) and the import of the official
//! HDF5 feature files ([`h5import`]). Storage itself (format, index, reader, writer) is
//! [`crate::store`]'s.

pub mod extract;
pub mod frozen;
pub mod h5import;
pub mod labels;
pub mod provenance;
